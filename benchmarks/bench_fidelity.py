"""Fidelity suite (see :mod:`csm_ext.bench.fidelity`): the energy objectives against
maximum-likelihood mixture baselines on the same backbones; the same as
``csm-ext bench fidelity``.

    python benchmarks/bench_fidelity.py            # toys + MNIST 5k: JSON, PNGs, markdown
    python benchmarks/bench_fidelity.py --quick    # a smoke run
"""
from csm_ext.bench.fidelity import MADE_ROWS, PCNN_ROWS, kl_estimate, main  # noqa: F401

if __name__ == "__main__":
    main()
