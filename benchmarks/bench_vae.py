"""VAEs with an implicit encoder (ELBO-Gaussian, SSM-implicit, CSM-implicit): see
csm_ext/bench/vae.py.

The benchmark lives in the package so that an installed csm_ext runs it as `csm-ext vae`;
this script is the same entry point from a checkout.
"""
import sys

from csm_ext.bench.vae import main  # noqa: F401

if __name__ == "__main__":
    main(sys.argv[1:])
