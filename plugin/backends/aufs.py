from plugin.backends.unavailable import aufs_init
from plugin.driver.registry import register

register("aufs", aufs_init, implemented=False)
