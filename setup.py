"""Packaging for tfnegcache."""

from setuptools import find_packages, setup

EXAMPLES = ["tensorflow-datasets>=4.9", "matplotlib>=3.8"]
# The Keras 3 front end (`tfnegcache.keras3`): Keras 3 with keras-rs, on JAX (CPU build) or
# TensorFlow. Pinned to the minor versions it is tested with.
KERAS3 = ["keras>=3.10", "keras-rs>=0.4,<0.5", "jax[cpu]>=0.10.2,<0.11"]

setup(
    name="tfnegcache",
    version="0.1.0",
    description=(
        "Train two-tower retrieval models in Keras against a large negative cache "
        "(Lindgren et al., NeurIPS 2021)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The library, and its examples (the MovieLens job, its data loader) as a package apart:
    # `examples/` installs as `tfnegcache_examples`, outside the library's import surface.
    packages=find_packages(include=["tfnegcache", "tfnegcache.*"]) + ["tfnegcache_examples"],
    package_dir={"tfnegcache_examples": "examples"},
    python_requires=">=3.10",
    # The library itself: enough to import tfnegcache and train with a negative cache.
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorflow-recommenders>=0.7.7",
        "numpy>=1.26",
    ],
    extras_require={
        # The MovieLens job (`python -m tfnegcache train`: its plot, the TFDS data source),
        # the notebook and the benchmarks' plots.
        "examples": EXAMPLES,
        "keras3": KERAS3,
        # The suite runs the Keras 3 tests on both backends too. ml_dtypes (TensorFlow's and
        # JAX's numpy types) 0.7.0 takes 1.2 s of CPU to import with numpy 2.4, 0.6.0 about
        # 8 ms, and 22 processes of the suite import it (docs/tests.md).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "nbclient>=0.10",
                 "nbformat>=5.10", "ipykernel>=6.29", "ml_dtypes>=0.5.1,<0.7"]
                + EXAMPLES + KERAS3,
    },
)
