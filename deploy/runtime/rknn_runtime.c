#define _POSIX_C_SOURCE 200809L
#include "rknn_runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "util.h"

#define LIBRARY "librknnrt.so"

#ifdef RKT_RKNN_LINKED

int rkt_rknn_api_open(rkt_rknn_api *api)
{
    memset(api, 0, sizeof *api);
    api->init = rknn_init;
    api->destroy = rknn_destroy;
    api->query = rknn_query;
    api->run = rknn_run;
    api->create_mem = rknn_create_mem;
    api->destroy_mem = rknn_destroy_mem;
    api->set_io_mem = rknn_set_io_mem;
    snprintf(api->library, sizeof api->library, "%s linked at build time (-DRKNN_SDK)", LIBRARY);
    return 0;
}

void rkt_rknn_api_close(rkt_rknn_api *api)
{
    memset(api, 0, sizeof *api);
}

#else

#include <dlfcn.h>

/* dlsym returns void *; POSIX guarantees it converts to a function pointer, ISO C does not, hence the memcpy. */
static int take(rkt_rknn_api *api, const char *symbol, void *slot, size_t size)
{
    void *fn = dlsym(api->handle, symbol);
    if (!fn)
        return rkt_fail(api->library, "has no %s (%s); it is older than this runner needs: install the librknnrt.so "
                        "of the rknn-toolkit2 release that converted the models", symbol, dlerror());
    memcpy(slot, &fn, size);
    return 0;
}

int rkt_rknn_api_open(rkt_rknn_api *api)
{
    const char *folder = getenv("RKNN_LIB");
    char first_error[400] = "";
    struct stat st;
    memset(api, 0, sizeof *api);
    if (folder && *folder) {
        int is_folder = stat(folder, &st) == 0 && S_ISDIR(st.st_mode);
        snprintf(api->library, sizeof api->library, is_folder ? "%s/" LIBRARY : "%s", folder);
        api->handle = dlopen(api->library, RTLD_NOW | RTLD_LOCAL);
    } else {
        const char *const places[] = {LIBRARY, "/oem/usr/lib/" LIBRARY};
        size_t i;
        for (i = 0; i < sizeof places / sizeof *places && !api->handle; i++) {
            snprintf(api->library, sizeof api->library, "%s", places[i]);
            if (!(api->handle = dlopen(places[i], RTLD_NOW | RTLD_LOCAL)) && !first_error[0])
                snprintf(first_error, sizeof first_error, "%s", dlerror());
        }
    }
    if (!api->handle) {
        if (!first_error[0])
            snprintf(first_error, sizeof first_error, "%s", dlerror());
        return rkt_fail(LIBRARY, "cannot load it (%s): copy the board's %s (the version of the rknn-toolkit2 that "
                        "converted the models) to /usr/lib or /oem/usr/lib, or set RKNN_LIB to its folder "
                        "(LD_LIBRARY_PATH works too)", first_error, LIBRARY);
    }
    if (take(api, "rknn_init", &api->init, sizeof api->init) ||
        take(api, "rknn_destroy", &api->destroy, sizeof api->destroy) ||
        take(api, "rknn_query", &api->query, sizeof api->query) || take(api, "rknn_run", &api->run, sizeof api->run) ||
        take(api, "rknn_create_mem", &api->create_mem, sizeof api->create_mem) ||
        take(api, "rknn_destroy_mem", &api->destroy_mem, sizeof api->destroy_mem) ||
        take(api, "rknn_set_io_mem", &api->set_io_mem, sizeof api->set_io_mem)) {
        rkt_rknn_api_close(api);
        return -1;
    }
    return 0;
}

void rkt_rknn_api_close(rkt_rknn_api *api)
{
    if (api->handle)
        dlclose(api->handle);
    memset(api, 0, sizeof *api);
}

#endif
