/* The C module of bcnswift.h: SwiftPM builds a C target only from a source file. The functions the header
 * declares are defined by the Swift target BCNSwiftC (@_cdecl); Swift reads the header's flags and status
 * codes from this module, so they are defined once. */
#include "bcnswift.h"

_Static_assert(sizeof(double) == 8 && sizeof(int64_t) == 8, "bcnswift's ABI assumes 64-bit doubles and int64_t");
_Static_assert(BCN_FLAGS_ALL == (BCN_BATCH_NORM | BCN_ESTIMATED | BCN_UNBIASED_RUNNING_VAR |
                                 BCN_VARIANCE_AROUND_RUNNING_MEAN | BCN_CUMULATIVE_AVERAGE | BCN_CHANNEL_NORM |
                                 BCN_NAN_RAISE | BCN_TRAINING | BCN_CHANNELS_LAST),
               "BCN_FLAGS_ALL is every normalization flag");
_Static_assert(BCN_WS_FLAGS_ALL == (BCN_WS_UNBIASED | BCN_WS_EPS_IN_SQRT), "BCN_WS_FLAGS_ALL is every WS flag");
