import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/toy.py, tests/planted.py
# a test module imports another's helpers by its name (from test_cli import run), whatever its folder
FOLDERS = ("audit", "benchmarks", "cli", "core", "gate", "models", "paths", "releases", "report", "stacks", "sweep")
sys.path[1:1] = [os.path.join(os.path.dirname(__file__), folder) for folder in FOLDERS]
