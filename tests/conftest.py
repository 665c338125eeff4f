import os
import sys

# the tests import helpers from each other (e.g. the toy problem of test_engine)
sys.path.insert(0, os.path.dirname(__file__))
