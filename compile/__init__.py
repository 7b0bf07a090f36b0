"""bertpool.compile: turn a fine-tuned open-source BERT classifier into a servable model.

Entry points (TensorFlow is imported lazily by each):

* ``bertpool-compile`` (:mod:`.cli`, :func:`.build.compile_model`): read a
  run_classifier SavedModel, google-research checkpoint or Hugging Face
  directory (:mod:`.weights`), rebuild it (:mod:`.rebuild`), export it for
  neuron (:mod:`.neuron`: toolchain, flags, trace, placement) or cpu/gpu, store
  reference pairs (:mod:`.selfcheck`), prove it equivalent (:mod:`.equivalence`),
  write manifest.json.
* ``bertpool-demo-model`` (:mod:`.demo_model`): a seeded random run_classifier
  SavedModel (tiny/base/large) that needs no download.
* :mod:`.runtime`: ``is_compiled_model`` / ``load_compiled`` for the workers (which
  checks the loaded binary against its reference pairs).
* ``python -m bertpool.bench.compile``: throughput and tolerance benchmarks.
"""
