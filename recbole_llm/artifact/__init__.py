"""The artifact contract, numpy only: file names, graph inputs and outputs, metadata.json, ranking, files.

Written by :mod:`recbole_llm.export`, read by :mod:`recbole_llm.serving`; imports neither torch nor RecBole.
"""
