from lightning_moe.cli import main

main()
