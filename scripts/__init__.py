"""Entry points run from the repository root as modules: python -m scripts.build_corpus ..."""
