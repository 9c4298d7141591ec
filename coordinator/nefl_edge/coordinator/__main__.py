from nefl_edge.coordinator.cli import main

main()
