from lctrun.cli import main

main()
