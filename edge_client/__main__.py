from nefl_edge.edge_client.cli import app

app(prog_name="nefl-edge")
