"""Facts about the Kaggle competition, defined once for the whole kit."""

COMPETITION = "histopathologic-cancer-detection"
TRAIN_IMAGES = 220_025   # the rows of train_labels.csv
TEST_IMAGES = 57_458     # the rows of sample_submission.csv: a submission answers exactly these ids
ID_LENGTH = 40           # every Kaggle id is 40 hexadecimal digits
IMAGE_SIZE = 96          # every patch is 96×96 RGB
CHANNELS = 3
CENTRE_SIZE = 32         # a patch is positive when tumour tissue touches its centre 32×32
CENTRE_START = (IMAGE_SIZE - CENTRE_SIZE) // 2
CENTRE = slice(CENTRE_START, CENTRE_START + CENTRE_SIZE)

TRAIN_LABELS_CSV = "train_labels.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
TRAIN_DIR = "train"
TEST_DIR = "test"
IMAGE_SUFFIX = ".tif"

# The names the kaggle client reads credentials from (never shipped in the bundle, never written by the kit)
KAGGLE_CREDENTIAL_FILES = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
