"""The converter's parts (data/convert.py is its CLI): image-text pairs read from tar shards or
CSV files (pair_sources.py), cleaned (pair_cleaning.py) and written as a plain TFDS directory
(pair_dataset.py). The embedded demo dataset's builder is elsewhere (data/builders/)."""
