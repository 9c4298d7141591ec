from nefl_edge.coordinator.cli import app

app(prog_name="nefl-coord")
