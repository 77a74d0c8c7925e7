"""Code both the API and the worker use: config, errors, naming, storage, jobs, queue contract."""


# the CLI's User-Agent starts so; the API reads it for the audit's "via" (an informational
# label: who acted is the token's subject)
CLI_AGENT = "safehold-cli/"


def safehold_version() -> str:
    """The installed package's version (what MCP and the CLI's User-Agent say)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safehold")
    except PackageNotFoundError:  # a source tree run without installing
        return "0+unknown"
