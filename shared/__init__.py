"""Code both the API and the worker use: config, errors, naming, storage, jobs, queue contract."""


def safehold_version() -> str:
    """The installed package's version (what MCP and the CLI's User-Agent say)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safehold")
    except PackageNotFoundError:  # a source tree run without installing
        return "0+unknown"
