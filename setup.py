"""Declares the C extensions (``rawref``, ``hostcopy``); all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rawref._rawref",
            sources=["rawref/rawref.c"],
        ),
        Extension(
            "hostcopy._hostcopy",
            sources=["hostcopy/hostcopy.c"],
            extra_compile_args=["-O2"],
        ),
    ]
)
