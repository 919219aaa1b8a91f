from plugin.backends.unavailable import devicemapper_init
from plugin.driver.registry import register

register("devicemapper", devicemapper_init, implemented=False)
