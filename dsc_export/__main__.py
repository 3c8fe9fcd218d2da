from dsc_export.cli import main

main()
