"""Our on-disk model format, and the one way to load any model path.

Modules, from the bottom up (each imports only those above it):

* ``layout``: the file and folder names, dtypes, ``CheckpointError`` and the shape check;
* ``writer``: the streaming writer of a converted DIR (``write_params``, ``save_params``);
* ``locate``: what a path holds (HF folder, converted DIR, training WORKDIR, step folder);
* ``reader``: Orbax ``params/`` folders restored onto a mesh, to host, or opened lazily;
* ``lora_base``: a LoRA workdir's ``lora.json`` (which base its adapters belong to) and adapters;
* ``loader``: ``load_model``, every kind (LoRA workdirs merged) -> ``LoadedModel``, with the
  dtype, compute dtype, attention and tokenizer policy every command shares.

A training run's own state (optimizer, data position, restore after a failure) is
``train.run_state``; it writes ``params`` in this format's names, and ``loader`` reads them.
"""
