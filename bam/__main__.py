from bam.cli import main

main()
