"""Building a cache store: the recipe that validates clips and runs the frozen models once (`build`), and
its unit of model work that any process can run (`shards`). The store itself — schema, writer, reader,
norms — is the `cache` package, which runs no model."""
