from nefl_edge.edge_client.cli import main

main()
