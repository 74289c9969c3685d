from deltapack.cli import main

main()
