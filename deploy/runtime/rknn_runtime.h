/* The RKNN C API functions the rknn backend calls, taken from librknnrt.so at run time (dlopen + dlsym), so the
   runner builds without Rockchip's SDK and starts on any board that has the library. Built with -DRKNN_SDK=...
   (RKT_RKNN_LINKED), the table holds the SDK's functions linked in instead. */
#ifndef RKT_RKNN_RUNTIME_H
#define RKT_RKNN_RUNTIME_H

#ifdef RKT_RKNN_SDK_HEADER
#include <rknn_api.h>
#else
#include "rknn_api_min.h"
#endif

typedef struct {
    int (*init)(rknn_context *context, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend);
    int (*destroy)(rknn_context context);
    int (*query)(rknn_context context, rknn_query_cmd cmd, void *info, uint32_t size);
    int (*run)(rknn_context context, rknn_run_extend *extend);
    rknn_tensor_mem *(*create_mem)(rknn_context ctx, uint32_t size);
    int (*destroy_mem)(rknn_context ctx, rknn_tensor_mem *mem);
    int (*set_io_mem)(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr);
    void *handle;        /* dlopen's, NULL when linked */
    char library[512];   /* where the functions came from, for messages */
} rkt_rknn_api;

/* Loads librknnrt.so: $RKNN_LIB (a folder or the file) when set, else the loader's search path (LD_LIBRARY_PATH,
   /usr/lib, ...), then /oem/usr/lib. One error line saying where to put the library on failure. */
int rkt_rknn_api_open(rkt_rknn_api *api);
void rkt_rknn_api_close(rkt_rknn_api *api);

#endif
