"""``strata migrate``: switch a data root between overlay2 and strata in place.

dockerd keys images and containers by storage-driver name, so a host that
switches drivers sees nothing it had.  strata's overlay backend keeps
overlay2's per-layer files, so a migration moves directories instead of
copying bytes: each layer dir is renamed between the two layouts
(``layout``), dockerd's ``image/<driver>`` is renamed, and each container's
``config.v2.json`` gets the new ``Driver``.  ``checks`` decides whether it may
start, ``steps`` runs it from a journal so a kill at any point can be finished
or undone, ``command`` is the CLI entry.
"""
