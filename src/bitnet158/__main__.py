from bitnet158.cli.main import main

main()
