"""Scaling of score-matching training steps with D: see csm_ext/bench/scaling.py.

The benchmark lives in the package so that an installed csm_ext runs it as
`csm-ext bench scaling`; this script is the same entry point from a checkout.
"""
from csm_ext.bench.scaling import METHODS, main  # noqa: F401

if __name__ == "__main__":
    main()
