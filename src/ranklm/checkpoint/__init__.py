"""ranklm checkpoints: safetensors + ranklm.json, written atomically, loaded strictly (docs/design.md §3).

* ``metadata``: the file names and what ``ranklm.json`` must hold (read and validated);
* ``writing``: ``save`` (a compressed model and its tokenizer, atomically);
* ``reading``: ``load`` and ``check_checkpoint`` (hashes, rank map against the model, tensor shapes);
* ``dense``: ``export_dense`` (factors multiplied back into a plain Hugging Face folder).

``ranklm.io`` is the face importing all of them. Core: nothing here imports the pipeline,
methods, apps, or ``ranklm.models``.
"""
