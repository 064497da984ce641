from parallelkit.report.compare import main

main()
