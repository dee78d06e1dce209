from safemerge.cli import main

main()
