# nefl-edge recipes. Run them through ./dev, which sets up the machine first (or `just` inside .venv).

set shell := ["bash", "-euo", "pipefail", "-c"]

# list the recipes
default:
    @just --list

# install Debian packages and the virtual environment (./dev does this before every recipe)
setup:
    @echo "set up: $(python --version), torch $(python -c 'import importlib.metadata as m; print(m.version("torch"))')"

# the main job: a real federated run on this machine (broker, 5 devices, 8 rounds, report)
demo *ARGS:
    nefl-coord demo {{ARGS}}

# the default test suite (unit + integration with a real Mosquitto; slow suites excluded)
test *ARGS:
    python -m pytest -q {{ARGS}}

# the slow suites (emulated devices, long runs)
test-slow *ARGS:
    python -m pytest -q -m slow {{ARGS}}

# hardware in the loop: emulated fleet (netns + tc tbf + cgroups, needs root) and, with NEFL_HIL_HOSTS=hosts.toml, real boards over SSH
test-hil *ARGS:
    python -m pytest -q -m hil tests/hil {{ARGS}}

# an emulated Raspberry Pi (Debian arm64, qemu-user-static, stock onnxruntime from PyPI): one step vs x86_64
test-arm64 *ARGS:
    command -v debootstrap >/dev/null && command -v qemu-aarch64-static >/dev/null || (apt-get update -qq && apt-get install -y -q debootstrap qemu-user-static)
    python -m pytest -q -s -m slow tests/test_arm64.py {{ARGS}}

# the device install in fresh virtual environments on Python 3.9 and 3.13 (where found): markers, CLI, one step
test-pythons *ARGS:
    python -m pytest -q -m slow tests/test_pythons.py {{ARGS}}

# ruff and mypy
lint:
    ruff check .
    ruff format --check .
    mypy core edge_client coordinator export

# performance benchmarks (device training, aggregation, wire, coordinator scale; under 20 min); writes bench/results/*.json, docs/benchmarks.md and prints the summary last
bench *ARGS:
    python -m bench {{ARGS}}

# accuracy of every method (NeFL, HeteroFL, FjORD, DepthFL, FedAvg baselines) in one harness; --preset quick|full
bench-accuracy *ARGS:
    python -m bench.accuracy {{ARGS}}

# stragglers: NeFL (deadline policy) vs FedAvg full (wait / drop) vs FedAvg smallest on an emulated mixed fleet; writes bench/results/fleet.json and docs/benchmarks.md
bench-fleet *ARGS:
    python -m bench.fleet {{ARGS}}

# the device wheel dist/nefl_edge-<version>-py3-none-any.whl: on a Pi, `pip install` of it pulls only the device dependencies
wheel:
    rm -f dist/nefl_edge-*.whl
    python -m pip wheel -q --no-deps -w dist .
    @ls dist/nefl_edge-*.whl

# regenerate the submodel table in README.md
specs-table:
    python -m nefl_edge.coordinator specs

# figures of the code's structure (issue 20's review): device imports, torch at import, docstrings, largest classes
house *ARGS:
    python -m bench.house {{ARGS}}

# the path of one update from device to global model on a real one-round demo: package crossings and upward calls (--python PY: another install)
trip *ARGS:
    python -m bench.trip {{ARGS}}

# our simulate (serial, --workers, --engine ray; bn federated and tracked) against Flower's Ray simulation engine on the same FedAvg job; makes .bench-venvs/flower (flwr[simulation], torch) on first use; writes bench/results/flower.json
bench-flower *ARGS:
    python -m bench.flower {{ARGS}}
