"""Loading Hugging Face models, one job a module (the face is ``ranklm.models``: load_model, load_classifier).

* ``dtypes``: ``--dtype`` values;
* ``folders``: what a local model folder holds (weights, ``ranklm.json``);
* ``packaged``: the packaged default decoder (GGUF converted once) and encoder;
* ``paths``: a folder, a Hugging Face cache snapshot or a hub id;
* ``strict``: weights that do not fit the model are errors, not random initialisations;
* ``offload``: accelerate device maps and onloading what they offloaded;
* ``tokenizer``: a folder's tokenizer, or None when it has none.

Core: nothing here imports the pipeline, methods or apps.
"""
