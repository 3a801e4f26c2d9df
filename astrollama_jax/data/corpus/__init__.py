"""The astro corpus: arXiv inputs -> section records -> a TFDS ArrayRecord dataset.

Inputs are what arXiv distributes: bulk source tars (``arXiv_src_YYMM_NNN.tar``, members
``YYMM/ID.gz`` or ``YYMM/ID.pdf``), their extracted ``YYMM/`` folders, single LaTeX bundles
and paper folders, and metadata JSON lines (the ``arxiv-metadata-oai-snapshot.json`` file, or
the project's abstracts format). A build runs in three steps:

1. parse: every *unit* (one bulk tar, or the loose bundles of one folder) is parsed entry by
   entry, in parallel over entries, into a result file under ``OUTPUT/.astro_corpus-work/``
   that appears (renamed into place) only once the unit is complete. A build that was killed
   starts again from the units it finished; the result of a unit depends on its bytes only,
   so a resumed build writes the same dataset as an uninterrupted one.
2. plan: the metadata is indexed by id (the winning record per id, not its abstract), joined
   with the parsed papers, and every entry gets its fate: kept, or skipped with a reason.
3. write: ``AstroCorpus`` (a ``tfds.core.GeneratorBasedBuilder``) streams the records out of
   the result files and the metadata, then ``manifest.json`` (the retention report, every
   skipped entry with its id and reason, every kept section's source span),
   ``section_index.npz`` (record indices per split and section) and ``record_keys.npz`` (id,
   section, version and date of every record, for updates and date-bounded mixtures). Records
   are held neither in a list nor in a dict, so memory does not grow with the corpus beyond a
   small per-paper index.

Decisions, so that the same inputs always give the same bytes:
* one record per (arXiv id, section); fields id, title, date, section, text, license, version.
  Ids lose their ``vN`` suffix; among several sources of a paper the highest version wins (a
  tie: the first). Among several metadata records of an id the highest version wins, then the
  latest ``update_date``/``date``, then the first. When both a metadata abstract and a LaTeX
  abstract exist, the metadata one (arXiv's own text) is kept.
* the split is a function of the id alone: sha256(id) as a fraction below
  ``validation_fraction`` means validation. All sections of a paper share a split.
* filters: categories (fnmatch, default ``astro-ph*``; a record is kept if any category
  matches), licences (``licenses``: fnmatch patterns on the metadata's ``license`` URL), dates
  (``since``/``until``, inclusive, on the first submission date; without metadata the month
  the id names). LaTeX papers without metadata are kept unless a licence filter is set (an
  unknown licence is not a redistributable one) and counted as ``no_metadata``.
* updates (``build(..., update=True)``): units already in the dataset are not read again; the
  new records go to new shards of a new dataset version beside the previous one, whose shards
  are hard links; an id already present is skipped unless the update brings a newer version
  (an unversioned source in a later unit counts as newer), whose records then replace the old.

The modules, read side first (training and evaluation import ``read`` alone; it imports
nothing of the build side, and this package imports no module of its own):
* ``read``: the dataset as readers see it: its folder, splits, ``TextSource``, the section
  index, record keys and mixture components.
* ``source_formats``: ``SOURCE_FORMATS``, the one table of input formats (recognizer and
  reader), and ``discover``, which sorts the inputs by it into units.
* ``config``: ``CorpusConfig`` (what to build) and ``Report`` (what was kept and skipped).
* ``parse``: step 1, resumable, one result file per unit.
* ``metadata``: the metadata index and its filters (categories, licences, dates).
* ``plan``: step 2, every entry's fate; ``collect`` returns the records in memory.
* ``tfds_builder``, ``manifest``, ``indexes``: step 3, the records and the files beside them.
* ``update``: a new version from an old one plus the new units.
* ``build``: ``build``, the entry point the ``prepare`` command calls.
"""
