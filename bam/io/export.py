"""The old home of backbone export and loading, kept so that code importing `bam.io.export`
keeps working. Each concern has its own module now: the export's layout
(`bam.io.export_layout`), reading (`bam.io.backbone_reader`: `load_backbone`, `read_backbone`, the
checkpoint formats), writing (`bam.io.export_writer`: `export_backbone`) and the command line
(`bam.io.export_cli`).
"""
from bam.io.backbone_reader import CHECKPOINT_FORMATS, detect_format, load_backbone, read_backbone, read_spec
from bam.io.export_cli import CLI_ERRORS, build_parser, main, run_export
from bam.io.export_layout import CONFIG_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, LEGACY_FILES, WEIGHTS_FILE
from bam.io.export_writer import ExportWriteError, export_backbone, export_config, write_export

__all__ = [
    "CHECKPOINT_FORMATS", "CLI_ERRORS", "CONFIG_FILE", "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "ExportWriteError",
    "LEGACY_FILES", "WEIGHTS_FILE", "build_parser", "detect_format", "export_backbone", "export_config",
    "load_backbone", "main", "read_backbone", "read_spec", "run_export", "write_export",
]
