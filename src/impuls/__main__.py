from impuls.cli import main

main()
