"""The archive's processes and what runs in them (the picture is in ``plugin.archive``).

``stream`` is the plugin's side (spawn, feed, collect, ``TarStream``); ``zygote``
forks the workers; ``worker`` is the child's entry point; ``extract`` (with its
``filehelper`` process) and ``export`` (with its helper) are the two jobs.
The tar format itself is ``plugin.archive.tar``.
"""
