/* The C module of bcnswift.h: SwiftPM builds a C target only from a source file. The functions the header
 * declares are defined by the Swift target BCNSwiftC (@_cdecl); Swift reads the header's flags and status
 * codes from this module, so they are defined once. */
#include "bcnswift.h"

_Static_assert(sizeof(double) == 8 && sizeof(int64_t) == 8, "bcnswift's ABI assumes 64-bit doubles and int64_t");
