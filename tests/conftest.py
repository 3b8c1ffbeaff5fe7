import os
import sys

# Tests import the flat scripts (train.py, evaluate.py, ...) and the packages from the repo root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
