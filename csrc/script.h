/*
 * script.h: the batched GCRA script that Redis runs (see script.c).
 */
#ifndef RG_SCRIPT_H
#define RG_SCRIPT_H

#include <stddef.h>

/* The GCRA script (mirrors gcra.c), batched. */
extern const char rg_script[];
extern const size_t rg_script_len; /* strlen(rg_script) */
/* The same over keys of several cluster slots, undeclared (see script.c). */
extern const char rg_script_xslot[];
extern const size_t rg_script_xslot_len;

#endif
