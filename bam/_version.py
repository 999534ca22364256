"""bam's version, in a module of its own so that low floors (exports record it) need not import the
package root."""
__version__ = "0.1.0"
