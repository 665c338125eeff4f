"""Running the clients on a Dask cluster."""

__all__ = ["dask_backend"]


def dask_backend(client=None, **kwargs):
    """Context in which fits run their clients on a Dask cluster.

    A thin wrapper of ``joblib.parallel_config(backend="dask")`` with an
    install hint when Dask is missing. Inside it, a fit scatters each
    client's rows to one worker once; every round then ships only the
    parameter (and server statistic) out and the compressed statistic back.

    Parameters
    ----------
    client : distributed.Client, default=None
        The cluster's client; the current default client when None.
    **kwargs
        Passed to :func:`joblib.parallel_config`.

    Returns
    -------
    context : joblib.parallel_config

    Examples
    --------
    >>> from distributed import Client, LocalCluster       # doctest: +SKIP
    >>> from skfedmm import FederatedDictionaryLearning, dask_backend
    >>> client = Client(LocalCluster(n_workers=2))          # doctest: +SKIP
    >>> with dask_backend(client):                          # doctest: +SKIP
    ...     FederatedDictionaryLearning(n_components=8).fit(clients)
    """
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise ImportError(
            "Running clients on Dask needs dask.distributed: "
            'pip install "skfedmm[dask]"'
        )
    from joblib import parallel_config

    if client is not None:
        kwargs["client"] = client
    return parallel_config(backend="dask", **kwargs)
