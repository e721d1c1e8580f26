"""Declares the ``rawref`` C extension; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rawref._rawref",
            sources=["rawref/rawref.c"],
        )
    ]
)
