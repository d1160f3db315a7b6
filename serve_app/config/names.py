"""The names of the deployments the app builder adds itself; a model may not take one."""

INGRESS_NAME = "ImagesIngress"
STORE_NAME = "ImageStore"
SAFETY_NAME = "SafetyChecker"
JOBS_NAME = "JobsConsumer"
RESERVED_NAMES = (INGRESS_NAME, STORE_NAME, SAFETY_NAME, JOBS_NAME)
