"""The skfedmm test suite (a package, so that tests import shared helpers)."""
