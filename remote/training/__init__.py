"""What every training recipe shares: loading the model, the data and its batches, the memory
plan, Hugging Face's ``Trainer`` set up over our batches, progress, checkpoints and outputs.

A recipe (:mod:`loraburst.remote.recipes`) composes these; a new objective or backend is a new
recipe, not a branch in each of them. Standard library at import; torch & co. inside functions.
"""
