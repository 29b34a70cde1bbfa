"""Only the optional C decoder; everything else about the package is in pyproject.toml.

The extension is ``optional``: when it does not compile (no compiler, no Python headers)
the install goes on without it and ``processor.receiver.decode`` uses its Python decoder.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "processor.receiver._fastdecode",
    sources=["processor/receiver/_fastdecode.c"],
    extra_compile_args=["-O2"],
    optional=True,
)])
