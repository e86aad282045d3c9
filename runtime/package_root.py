from pumice.runtime import *  # noqa
