from safemerge.cli.main import main

main()
