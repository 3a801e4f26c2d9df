"""Foreign weight formats as plain readers and writers of our parameter trees.

``mapping`` is the one table between our parameter paths and Hugging Face tensor names (Meta's
shards are read through it too, in ``convert.meta``); ``hf`` reads and writes HF folders,
``hf_tokenizer`` writes their tokenizer files (with a chat template's Jinja string). Nothing
here knows our own on-disk layout: ``checkpoints`` builds on these (an HF folder is one of the
kinds ``checkpoints.loader.load_model`` reads), and the ``convert`` and ``export`` commands build
on both.
"""
