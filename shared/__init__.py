"""Code both the API and the worker use: config, errors, naming, storage, jobs, queue contract."""
